"""int8 calibration: inputs recorded along real guided trajectories, then Q/DQ graphs.

    dataset.py   `record_calibration_set`: run the build's fp32 ONNX Runtime pipeline over N seeds
                 and labels, record every component's feeds at every step, in resumable shards
                 under BUILD/calibration/ (`gdexport calibrate`).
    quantize.py  `quantize_graph`: ONNX Runtime's static Q/DQ quantiser over those shards, symmetric
                 int8, per-channel weights, sensitive layers kept in float (`sensitive_nodes`).
    quality.py   int8 against fp32 on the recorded feeds: relative RMS error, cosine similarity.
    speed.py     int8 against fp32 per call on ONNX Runtime (`python -m calibration.speed BUILD`).
    int8.py      what `gdexport build --int8` runs: all of the above for every component.
    digits.py    int8 against fp32 on the digits family, by the independent judge
                 (`python -m calibration.digits BUILD`).

May import `runtime` and `export`; `runtime` never imports this package.
"""
