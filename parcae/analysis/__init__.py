"""parcae.analysis: curve fits on measured losses — the test-time law and Table 12's forms (``fits``), and the
training scaling laws: isoFLOP optima, power laws, the parametric and unified laws (``scaling``). NumPy/SciPy only:
nothing here trains or loads a model."""
