"""Constraints as automata: compiled on the host into tables, walked on the device.

- :mod:`jaxsample.automata.stop`: stop strings (per-row KMP automata over token bytes).
- :mod:`jaxsample.automata.json_mode`: the exact JSON-object token mask.
- :mod:`jaxsample.automata.json_schema`: JSON Schema outputs (a pool of compiled schemas;
  patterns through :mod:`jaxsample.automata.regex`).

See docs/constraints.md.
"""
