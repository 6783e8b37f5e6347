//! The metrics area's settings: the level of the per-call access log
//! (`server.access_log`).

/// The level of the one log line per call (`server.access_log`), target
/// `mosaic_mesh::access`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessLog {
    /// At INFO, shown by the default `--log info`.
    #[default]
    Info,
    /// At DEBUG: kept out of the default log, there with `--log debug` (or
    /// `mosaic_mesh::access=debug`).
    Debug,
    /// Not written at all (the call metrics still count every call).
    Off,
}

impl std::str::FromStr for AccessLog {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "info" => Ok(AccessLog::Info),
            "debug" => Ok(AccessLog::Debug),
            "off" => Ok(AccessLog::Off),
            other => Err(format!(
                "{other:?} is not a level for the call log; expected \"info\", \"debug\" or \"off\""
            )),
        }
    }
}
