"""The offline demo: an embedded tiny pretrained model and four experiments with a Markdown + PNG report.

    python -m examples.demo --out reports/demo          # < 10 min on 2 CPU cores
    python -m examples.demo --out /tmp/demo --quick     # CI size, < 2 min

Modules: ``corpus`` (the generated tiny-world text), ``pretrain`` (the embedded model, cached),
``runs`` (experiments a-d), ``report`` (tables and plots), ``__main__`` (the command line).
"""
