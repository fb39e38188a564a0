"""Test helpers by purpose: `tokens` (vocabularies, documents, token shards), `media`
(images and raw shard inputs), `runs` (a small plan, the CLI runner, tiny models), `procs`
(kill-and-resume), `chameleon` (a Chameleon-format tokenizer and checkpoint). Fixtures are in
tests/conftest.py."""
