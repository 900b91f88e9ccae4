"""metaseg-tf: brain-metastasis segmentation in 2D MRI slices with U-Net++ and Attention U-Net (Keras 3).

Stages as packages: ``data`` (Keras-free), ``models``, ``training``, ``evaluation``; then ``predict``,
``pipeline`` (the papermill main job), ``serve`` (the web app) and ``cli``. Importing the package is cheap:
the deep-learning backend is imported only by the modules that need it (``data.batches``, ``models``,
``training``, ``evaluation.report``, ``predict``).
"""

__version__ = "0.1.0"
