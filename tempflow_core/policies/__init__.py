"""The policy: a flow-matching transformer with its LoRA, behind one interface.

    base.py        FlowPolicy, the interface (velocity, prompt encoding, LoRA state, reference)
    sd3.py         StableDiffusion3Pipeline + peft LoRA (SD3.5-M and the tiny SD3)
    flux.py        FluxPipeline (FLUX.1-dev and the tiny FLUX): guidance-distilled, no CFG pair
    qwen_image.py  QwenImagePipeline (Qwen-Image and the tiny one): true CFG, masked text, no pooled
    wan.py         WanPipeline (Wan2.1 text-to-video and the tiny one): clips with a frame axis
    models.py      loading any registered family's folder offline; building the tiny SD3 pipeline
    tiny_flux.py   the tiny FLUX pipeline
    tiny_qwen_image.py  the tiny Qwen-Image pipeline (its byte-level BPE tokenizer trained offline)
    tiny_wan.py    the tiny Wan pipeline
    tiny_parts.py  what the tiny pipelines share (CLIP BPE tokenizer files, the tiny VAE)

`families.make_policy` picks the policy of a loaded pipeline's family.

Imports: the base modules (config, families, seeding) only.
"""
