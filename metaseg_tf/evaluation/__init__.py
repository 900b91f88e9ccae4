"""Evaluation: every score once (:mod:`.scores`, NumPy/SciPy), run reports and comparisons
(:mod:`.report`), and model cost (:mod:`.complexity`).

Nothing is imported here, so ``metaseg_tf.evaluation.scores`` stays usable without Keras.
"""
