"""Evaluation: every score once (:mod:`.scores`, NumPy/SciPy), run reports, ensembles and comparisons
(:mod:`.report`), patient-level k-fold cross-validation (:mod:`.crossval`) and model cost (:mod:`.complexity`).

Nothing is imported here, so ``metaseg_tf.evaluation.scores`` stays usable without Keras.
"""
