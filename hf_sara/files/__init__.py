"""Files: what hf_sara reads and writes on disk, one module per job.

- [`atomic`]: writes a reader never sees half done (a temporary file or folder renamed into place once complete).
- [`lock`]: one writer per output folder ([`directory_lock`]).
- [`checkpoints`]: which checkpoint a run can resume from ([`complete_checkpoint`]), and what it holds.
- [`records`]: record files (JSON lines, JSON lists, CSV and TSV tables) and UTF-8 text.
- [`package_data`]: the files shipped inside the package.
- [`names`]: names made safe for file names ([`safe_file_name`]).
"""
