"""The evaluation harness: an experiment config through lmms-eval, resumably, locally or on Slurm.

Its modules, in the order data flows through them (each imports only those before it):

- ``errors``, ``files``, ``resources``, ``catalogue``: what all share (errors, atomic JSON, where
  the project's files are, the methods and models a config may name);
- ``config``: read and check a config; ``checkpoints``: the tiny checkpoints built here;
- ``records``: the attempts' records and what they prove finished; ``run_check``: the one checker
  of an attempt (shared with the GPU check); ``plan``: the runs, their settings, commands and
  environments; ``code_identity``: which code a child runs;
- ``processes``, ``attempt``: one attempt started, checked and recorded, wherever it runs;
  ``executors``: where (``local``, ``slurm``); ``folder_lock``: one writer per runs folder;
- ``prerequisites``, ``cli`` (``otprune run``) and ``status`` (``otprune status``).

The report (otprune.report) reads the records; nothing here imports it but the CLI, at the end.
"""
