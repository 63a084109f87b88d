"""decide: pure functions from a kind's observation (what handlers/observe.py read from the caches) to an
`Outcome` (the children to have, the verdict for status, when to look again). No engine, no cache, no clock:
everything they read is in the observation, so each is tested with a hand-built one."""
