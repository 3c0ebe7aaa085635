"""Scale-out on Ray: many workers behind one server (`nodegraph serve --ray [ADDRESS] --workers N`).

`router` decides which worker runs which job (affinity by the model files a job names), `actor` is
a worker (its own executor, cache and models), `pool` is the server's side (dispatch, events,
faults) and `cluster` starts or joins Ray and places the actors. Ray is an optional dependency
(`pip install -e ".[ray]"`); only `router` imports without it.
"""
