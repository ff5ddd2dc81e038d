"""What a sweep's results say: validation-only selection (:mod:`.selection`), headline tables and cost
bands (:mod:`.report`), the cost frontier and the seed claims (:mod:`.frontier`), robustness to jailbreak
transformations (:mod:`.robustness`), scoring new data with a saved probe (:mod:`.scoring`) and generated
exchanges (:mod:`.generation`). Figures are drawn in :mod:`experiments.viz`."""
