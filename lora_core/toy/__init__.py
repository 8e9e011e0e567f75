"""builtin:toy-sd: a 64x64 SD 1.x pipeline the project pretrains on a drawn world of coloured shapes.

world.py draws the world and captions it; checker.py judges a picture without any model; model.py is the
architecture; pretrain.py trains it (`python -m lora_core.toy pretrain`); score.py draws and judges;
shipped.py checks the committed weights (weights/, SHA256SUMS).
"""
