"""The web page's helpers that never import torch: the job registry, the form spec, uploads and previews.

They sit beside the engine (`lora_core`), not inside it: they read the configuration model and start jobs,
and everything that touches a device stays in `lora_core`.
"""
