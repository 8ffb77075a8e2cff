"""Zero-output experts.

Modules, in import order (no cycles): ``routing`` (routing math and the router mixin; zeda's
router class of each family is generated here from its spec), ``experts`` (experts backends
that skip zero slots; the private transformers hooks), ``structure`` (finding MoE layers,
growing routers), ``teacher`` (teacher mode), ``modeling`` (``zeda_<family>`` config and model
classes, registered with transformers), ``inject`` (injection), ``reference_format`` (the ZEDA
authors' checkpoints) and ``calibrate`` (a FLOP budget baked into the config).
"""
