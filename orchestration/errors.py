"""The error every orchestration step raises for a problem the user can fix; jobs print it in one line."""


class PipelineError(RuntimeError):
    pass
