"""Test helpers by purpose: `media` (raw inputs: text, pictures, sound, video, tars, and input
shard directories), `outputs` (reading a stage's output back), `tokens` (vocabularies,
documents, token shards), `runs` (a small plan, the CLI in process and as a child process,
tiny models), `procs` (kill-and-resume), `chameleon` (a Chameleon-format tokenizer and
checkpoint). Fixtures are in tests/conftest.py. No test module imports another."""
