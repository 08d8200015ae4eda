"""Evaluations of a frozen backbone: dataset-ordered feature extraction and its cache, the
linear-eval and kNN protocols (``frozen``, ``protocols``), and person re-identification
(``reid``)."""
