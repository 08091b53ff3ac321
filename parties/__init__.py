"""Party-side code: protocols, their roles, models and data.

* ``pcmoe/``, ``privatelora/``, ``federated/``, :mod:`.split`, ``single_site/`` -- the
  protocols, one sub-package per family;
* :mod:`.registry` -- protocol name -> class (imports nothing from the project);
* :mod:`.base` -- the protocol base class and shared training helpers;
* :mod:`.models`, :mod:`.layers`, :mod:`.shapes` -- building and slicing ``transformers``
  models; :mod:`.defences` -- wrappers on what a role sends; ``data/`` -- private text.

May import: contracts (:mod:`testbed.errors`, :mod:`testbed.units`, :mod:`testbed.scenario`)
and :mod:`testbed.engine` -- never ``attacks``, ``testbed.run``, ``testbed.net`` or the
commands.
"""
