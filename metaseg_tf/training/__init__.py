"""Training: losses and Keras metrics (:mod:`.losses`, :mod:`.metrics`), the training engine
(:mod:`.train`) and run folders (:mod:`.runs`).

Nothing is imported here, so ``metaseg_tf.training.runs`` (plain files and JSON) stays usable without Keras.
"""
