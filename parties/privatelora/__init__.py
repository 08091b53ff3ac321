"""PrivateLoRA: the cloud runs the frozen stack, the device keeps data, embeddings, head and
a tiny trainable r×r matrix; only low-rank activations cross.

* :mod:`.protocol` -- the protocol and its cloud/device roles;
* :mod:`.lowrank` -- the frozen A, B factors and the split decoder stack;
* :mod:`.wire` -- options and the per-pass message plan (also used by the cost model);
* :mod:`.full` -- the full-hidden split baseline;
* :mod:`.baselines` -- ``lora``, ``device_only``, ``cloud_only`` (peft LoRA);
* :mod:`.pretrain` -- pre-trains the frozen base on public text
  (``python -m parties.privatelora_base``).

May import: contracts, :mod:`testbed.engine`, ``parties`` helpers.
"""
