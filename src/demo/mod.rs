//! `outrider demo`.
pub fn main(_keep_running: bool) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("not yet")
}
