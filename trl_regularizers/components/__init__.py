"""The regularizers as components: built once when a trainer is constructed, from its config and the registries.

An adapter (``trainers/adapters/``) hands a component typed records (``core.records``) and takes back a loss term,
a reward column or a bounded reference. Components name nothing of TRL: ``KLPenalty`` (``kl.py``), ``PtxTerm``
(``ptx.py``), ``PreferenceTerms`` (``preference.py``), the checkpointed ``RegularizerState`` (``state.py``) and the
``MetricSink`` they log through (``metrics.py``).
"""
