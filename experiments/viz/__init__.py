"""Every figure (plotly): a sweep's results (:mod:`.results`), the HTML report (:mod:`.report`), streaming
monitors (:mod:`.stream`), SAE latents (:mod:`.sae`), robustness (:mod:`.robustness`); saved as HTML and PNG
where kaleido works (:mod:`.save`)."""
