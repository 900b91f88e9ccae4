"""metaseg-tf: brain-metastasis segmentation in 2D MRI slices with U-Net++ and Attention U-Net (Keras 3).

Stages as packages, imports pointing one way (README, "Layout"): ``data`` (Keras-free), ``runs`` (run folders
and their records), ``models``, ``training``, ``inference`` (the Predictor: the one way to make a mask),
``evaluation``; then ``pipeline`` (the papermill main job), ``notebook``, ``serve`` (the web app) and ``cli``.
Importing the package is cheap: the deep-learning backend is imported only by the modules that need it
(``data.batches``, ``models``, ``training``, ``inference``, ``evaluation.report``).
"""

__version__ = "0.1.0"
