"""The command line: parser fuzzing and fetch-progress."""
