"""``python -m parties.privatelora_base SCENARIO``: the documented command for pre-training
PrivateLoRA's frozen base; the tool itself is :mod:`parties.privatelora.pretrain`."""
from parties.privatelora.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
