"""AdaMoE for DeepSpeed: a gate for DeepSpeed-MoE (``gate``), and DeepSpeed's CPU communication
extension built once up front (``extension``). Imports ops/ (never mcore/); deepspeed is an
optional dependency (``pip install megatron-adamoe[deepspeed]``), imported on use.

ZeRO fine-tuning of AdaMoE models in Hugging Face form is ``megatron_adamoe.hf.finetune``."""
