"""Data layer: discovery, reading, the synthetic phantom, patient-level splits, preprocessing and its
cache, augmentation, dataset summaries and exploration statistics; none of it needs a deep-learning backend.

The batches (:mod:`metaseg_tf.data.batches`, a ``keras.utils.PyDataset``) import Keras and are therefore not
imported here.
"""

from metaseg_tf.data.discover import (
    DataError,
    DiscoveryReport,
    SlicePair,
    discover_pairs,
)
from metaseg_tf.data.io import read_image, read_mask, read_pair
from metaseg_tf.data.split import (
    PatientSplit,
    kfold_patients,
    split_for_config,
    split_patients,
)
from metaseg_tf.data.summary import DatasetSummary, summarise_dataset
from metaseg_tf.data.synthetic import PhantomSummary, generate_phantom

__all__ = [
    "DataError",
    "DatasetSummary",
    "DiscoveryReport",
    "PatientSplit",
    "PhantomSummary",
    "SlicePair",
    "discover_pairs",
    "generate_phantom",
    "kfold_patients",
    "read_image",
    "read_mask",
    "read_pair",
    "split_for_config",
    "split_patients",
    "summarise_dataset",
]
