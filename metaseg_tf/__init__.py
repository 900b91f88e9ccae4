"""metaseg-tf: brain-metastasis segmentation in 2D MRI slices with U-Net++ and Attention U-Net (Keras 3).

Importing the package is cheap: the deep-learning backend is imported only by the modules that need it
(``metaseg_tf.data.pipeline`` and, later, the models and training code).
"""

__version__ = "0.1.0"
