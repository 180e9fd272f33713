"""parcae.experiments: orchestration on top of training, evaluation and analysis — sweeps (``sweep``), CPU
miniatures (``miniatures``), the paper's tables as data and reports (``report``), the scaling-law study
(``scaling_study``) and the test-time loop-sweep report (``test_report``)."""
