"""Sample extensions: reference behaviour of the Beamline extensions, served over NATS.

`normalize_text`, `pii_guard`, `mask_pii` and `test_provider` follow the reference
behaviour of the wire contract; `flaky` fails on demand (see `extreg.samples.flaky`) and
`echo` answers with the request unchanged. `SAMPLE_EXTENSIONS` lists their registry
records; `run_samples()` / `SampleRunner` serve them; `main()` backs
`extreg sample-extensions`.
"""

from extreg.errors import SampleRunnerError
from extreg.samples.extensions import (
    FLAKY_CONTROL_SUBJECT,
    SAMPLE_EXTENSIONS,
    SAMPLES_BY_ID,
    SampleExtension,
)
from extreg.samples.flaky import Flaky, FlakySettings
from extreg.samples.runner import (
    SampleRunner,
    main,
    run_samples,
    serve_forever,
)

__all__ = [
    "FLAKY_CONTROL_SUBJECT",
    "SAMPLES_BY_ID",
    "SAMPLE_EXTENSIONS",
    "Flaky",
    "FlakySettings",
    "SampleExtension",
    "SampleRunner",
    "SampleRunnerError",
    "main",
    "run_samples",
    "serve_forever",
]
