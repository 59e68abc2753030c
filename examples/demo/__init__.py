"""The offline demo: an embedded tiny pretrained model, the over-optimization study and panels (a)-(f), with a Markdown +
PNG report.

    python -m examples.demo --out reports/demo          # default size, < 10 min on 2 CPU cores
    python -m examples.demo --out reports/demo --full   # the whole over-optimization study, 3 seeds (about an hour)
    python -m examples.demo --out /tmp/demo --quick     # CI size, < 2 min

Modules: ``corpus`` (the generated tiny-world text), ``pretrain`` (the embedded model, cached),
``plan`` (the sizes and their jobs), ``runs`` (panels a-e), ``overopt`` and ``bestofn`` (the study), ``forget`` (panel f),
``report`` (tables and plots), ``__main__`` (the command line).
"""
