"""The CPU demo: what `python cord.py` runs without --model.

`python cord.py` without --model (run.py), the tiny Qwen2-Audio it trains (tiny_lalm.py) and its shipped weights
(tiny/).
"""
