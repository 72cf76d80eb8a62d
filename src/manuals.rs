//! Man pages and shell completions, generated from the clap definitions (`cli` passes its
//! `clap::Command`) so they can never drift from the flags (`malai ssh man <dir>`,
//! `malai ssh completions <shell>`; the Debian package ships what these print). Names no
//! other module: the command comes in as a value.

use std::path::Path;

/// Write a man page for `malai` and every visible subcommand into `dir` (`malai.1`,
/// `malai-ssh.1`, `malai-ssh-server.1`, …); returns the file names written.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<String>> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("malai") && n.ends_with(".1"))
        .collect();
    names.sort();
    Ok(names)
}

/// The `malai ssh` man page alone (what `man malai-ssh` shows), as roff.
pub fn ssh_man_page(cmd: clap::Command) -> std::io::Result<Vec<u8>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let ssh = cmd
        .find_subcommand("ssh")
        .cloned()
        .ok_or_else(|| std::io::Error::other("no ssh subcommand"))?;
    let mut out = vec![];
    clap_mangen::Man::new(ssh).render(&mut out)?;
    Ok(out)
}

/// The completion script for `shell`, for the `malai` binary.
pub fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = vec![];
    clap_complete::generate(shell, &mut cmd, "malai", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::CommandFactory;

    /// Every visible subcommand gets a page, and the pages carry the flags.
    #[test]
    fn man_pages_follow_the_clap_definitions() {
        let t = tempfile::tempdir().unwrap();
        let names = write_man_pages(Cli::command(), t.path()).unwrap();
        for want in [
            "malai.1",
            "malai-ssh.1",
            "malai-ssh-server.1",
            "malai-ssh-doctor.1",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.contains("-man")),
            "hidden `man` got a page"
        );
        let server = std::fs::read_to_string(t.path().join("malai-ssh-server.1")).unwrap();
        assert!(server.contains("max\\-requests\\-per\\-peer"), "{server}");
        let ssh = String::from_utf8(ssh_man_page(Cli::command()).unwrap()).unwrap();
        assert!(ssh.contains(".TH malai-ssh"), "{ssh}");
    }

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let text = String::from_utf8(completions(Cli::command(), shell)).unwrap();
            assert!(text.contains("doctor"), "{shell}: no doctor");
            assert!(text.contains("known-hosts"), "{shell}: no known-hosts");
        }
    }
}
