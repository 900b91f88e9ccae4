"""Evaluation: every score once (:mod:`.scores`, NumPy/SciPy), a run's report (:mod:`.report`), ensembles
(:mod:`.ensemble`), statistics (:mod:`.stats`), comparisons (:mod:`.compare`), notebook studies (:mod:`.studies`),
patient-level k-fold cross-validation (:mod:`.crossval`) and model cost (:mod:`.complexity`). Every mask scored here
is made by the :class:`~metaseg_tf.inference.predictor.Predictor`.

Nothing is imported here, so ``metaseg_tf.evaluation.scores`` stays usable without Keras.
"""
