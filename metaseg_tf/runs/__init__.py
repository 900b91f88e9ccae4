"""Run folders and the records in them: :mod:`.folders` (a training run's folder, its files, locks, the newest
run) and :mod:`.records` (evaluation records: which evaluation is current, the threshold one chose; the runs a
cross-validation trained).

Plain files and JSON, no Keras: this layer sits between ``data`` (``load_run_split`` returns a
:class:`~metaseg_tf.data.split.PatientSplit`) and ``models``, so inference, evaluation and the web app all read
run folders the same way. Nothing is imported here.
"""
