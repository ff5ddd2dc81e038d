"""A sweep: its spec (:mod:`.spec`), its data (:mod:`.data`), the context its runners work in
(:mod:`.context`), its groups of runs (:mod:`.groups`), its results folder and row schema (:mod:`.results`)
and the engine that runs it (:mod:`.engine`)."""
