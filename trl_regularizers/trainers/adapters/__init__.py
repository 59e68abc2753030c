"""The seam to TRL: one adapter per TRL trainer (plus ``base``), the only modules that name TRL's private
methods and attributes. Each turns what its parent already computed into typed records (``trainers.records``)
and offers explicit insertion points to the regularizers. ``docs/trl_internals.md`` lists the TRL facts they rely
on; ``tests/test_trl_contract.py`` checks them on every supported TRL release.
"""
