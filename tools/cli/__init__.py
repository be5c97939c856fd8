"""The user commands: ``alsgd-tune`` (:mod:`.tune`) and ``alsgd-run`` (:mod:`.run`)."""
