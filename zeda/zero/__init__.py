"""Zero-output experts.

The routing math itself is the routing core, `zeda_routing` (torch only). Modules, in import
order (no cycles): ``routing`` (the router mixin over the core; zeda's router class of each
family is generated here from its spec), ``telemetry`` (`RouterTelemetry`: measured shares), ``cpu_strategy`` (the
backends' CPU strategy choice), ``experts`` (experts backends that skip zero slots; the private
transformers hooks), ``structure`` (finding MoE layers,
growing routers), ``teacher`` (teacher mode), ``modeling`` (``zeda_<family>`` config and model
classes, registered with transformers), ``inject`` (injection), ``reference_format`` (the ZEDA
authors' checkpoints) ``calibrate`` (a FLOP budget baked into the config) and ``start`` (where distillation starts).
``zero`` imports nothing from ``distillation``, ``evaluation`` or ``io``.
"""
