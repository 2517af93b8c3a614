"""int8 calibration: inputs recorded along real guided trajectories, then Q/DQ graphs.

    dataset.py   `record_calibration_set`: run the build's fp32 ONNX Runtime pipeline over N seeds
                 and labels, record every component's feeds at every step, in resumable shards
                 under BUILD/calibration/ (`gdexport calibrate`).
    quantize.py  `quantize_graph`: ONNX Runtime's static Q/DQ quantiser over those shards, symmetric
                 int8, per-channel weights, sensitive layers kept in float (`sensitive_nodes`).
    quality.py   int8 against fp32 on the recorded feeds: relative RMS error, cosine similarity.
    speed.py     int8 against fp32 per call on ONNX Runtime (`python -m calibration.speed BUILD`).

The build's int8 leaf (export/precision/int8.py) runs all of the above for every component; the
digits family's int8 judgement is examples/digits_int8.py.

Imports `runtime` only: `export` imports this package, never the other way round, and `runtime`
imports neither.
"""
