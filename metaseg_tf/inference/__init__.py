"""Inference: one way to make a mask.

:mod:`.loading` (a run's saved model, the network that is run), :mod:`.engines` (Keras, ONNX Runtime, OpenVINO
runtimes), :mod:`.export` (exports and the engine of a run), :mod:`.postprocess` (small-lesion removal),
:mod:`.predictor` (the :class:`~metaseg_tf.inference.predictor.Predictor`: preprocessing, engine, flip TTA,
threshold, post-processing; an ensemble of runs or a cross-validation's folds is one too) and :mod:`.files`
(slice, folder and NIfTI outputs, per-case scores). Evaluation makes its masks through the Predictor too.
Nothing is imported here.
"""
