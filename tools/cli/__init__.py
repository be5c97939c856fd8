"""The user commands: ``alsgd-tune`` (:mod:`.tune`), ``alsgd-run`` (:mod:`.run`) and ``alsgd-sim``
(:mod:`.sim`); :mod:`.args` holds their shared argument types."""
