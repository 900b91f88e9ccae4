"""Training: losses and Keras metrics (:mod:`.losses`, :mod:`.metrics`) and the training engine (:mod:`.train`).
Run folders are :mod:`metaseg_tf.runs`."""
