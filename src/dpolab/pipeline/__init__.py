"""Steps that run a model on data, above the engine and the judges: sampling candidates (:mod:`.sample`) and
judging them (:mod:`.judge`). The steps that need no model (reading records, pairs, scenarios) are in
:mod:`dpolab.data.onpolicy`.
"""
