"""traffic_retrieval: text-to-image retrieval for traffic scenes with BEiT-3.

One module per concern; the stage scripts (``train_det_cls.py``, ``val_det_cls.py``, ``code/*.py``) only parse
arguments and call into this package. See README.md for the data flow between stages.
"""

__version__ = "0.1.0"
