"""PC-MoE: parties keep private backbones and gates and host a round-robin shard of every
MoE layer's experts; only routed hidden states and their gradients cross.

* :mod:`.protocol` -- the protocol and its coordinator/party roles;
* :mod:`.owner` -- a party's forward/backward over its own tokens, sending routed rows out;
* :mod:`.host` -- a party serving the experts it hosts to the others;
* :mod:`.layout` -- how a message's rows are laid out (the hiding options);
* :mod:`.sharding` -- which party hosts which expert; routing; slicing a model's experts;
* :mod:`.meter` -- memory accounting of what a party keeps for backward.

May import: contracts, :mod:`testbed.engine`, ``parties`` helpers (base, models, layers).
"""
