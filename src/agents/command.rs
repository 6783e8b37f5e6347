//! Command templates and spawn input checks: placeholders replaced as whole
//! arguments (never spliced into a string a shell would parse), label rules,
//! agent type names. Pure: no I/O.

use std::collections::BTreeMap;

/// The placeholders a command template may use, each as a whole argument.
pub const PLACEHOLDERS: [&str; 4] = ["{prompt}", "{task_id}", "{agent_id}", "{workdir}"];

/// At most this many labels per agent.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes (its characters are ASCII).
pub const MAX_LABEL_KEY_BYTES: usize = crate::text::identifier::MAX_LABEL_KEY_CHARS;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Longest task id, in bytes.
pub const MAX_TASK_ID_BYTES: usize = 256;
/// Longest agent type name, in bytes (an identifier: ASCII).
pub const MAX_TYPE_NAME_BYTES: usize = crate::text::identifier::MAX_CHARS;

/// The values substituted into a command template.
#[derive(Debug, Clone, Copy)]
pub struct Substitutions<'a> {
    /// For `{prompt}`.
    pub prompt: &'a str,
    /// For `{task_id}`.
    pub task_id: &'a str,
    /// For `{agent_id}`.
    pub agent_id: &'a str,
    /// For `{workdir}`.
    pub workdir: &'a str,
}

/// Checks a configured command: non-empty, a program name, and placeholders
/// only as whole arguments.
///
/// An argument such as `--prompt={prompt}` or `echo {prompt}` is refused: the
/// runtime never splices text into an argument, so such a template would pass
/// the braces literally, and inside a shell string it would invite injection.
pub fn check_template(command: &[String]) -> Result<(), String> {
    let Some(program) = command.first() else {
        return Err("must name a program, e.g. [\"/bin/sh\", \"-c\", \"{prompt}\"]".to_owned());
    };
    if program.is_empty() {
        return Err("the program (first element) is empty".to_owned());
    }
    if PLACEHOLDERS.contains(&program.as_str()) {
        return Err(format!(
            "the program (first element) cannot be the placeholder {program}"
        ));
    }
    for argument in command {
        if argument.contains('\0') {
            return Err("an argument contains a NUL byte".to_owned());
        }
        if PLACEHOLDERS.contains(&argument.as_str()) {
            continue;
        }
        if let Some(placeholder) = PLACEHOLDERS
            .iter()
            .find(|placeholder| argument.contains(*placeholder))
        {
            return Err(format!(
                "{placeholder} must be a whole argument, not part of {argument:?}: it is passed as one argument and never spliced into text"
            ));
        }
    }
    Ok(())
}

/// The argument vector for one agent: each whole-argument placeholder is
/// replaced by its value, every other argument is kept as written.
pub fn render(command: &[String], values: Substitutions<'_>) -> Vec<String> {
    command
        .iter()
        .map(|argument| match argument.as_str() {
            "{prompt}" => values.prompt.to_owned(),
            "{task_id}" => values.task_id.to_owned(),
            "{agent_id}" => values.agent_id.to_owned(),
            "{workdir}" => values.workdir.to_owned(),
            _ => argument.clone(),
        })
        .collect()
}

/// Checks an agent type name: an identifier (`crate::text::identifier`).
pub fn check_type_name(name: &str) -> Result<(), String> {
    crate::text::identifier::check("agent_type", name)
        .map_err(|message| format!("{message}, not {name:?}"))
}

/// Checks labels: at most 32; keys as `crate::text::identifier` has them
/// (1 to 128 identifier characters or `/`); values up to 256 bytes of
/// printable text.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels, not {}", labels.len()));
    }
    for (key, value) in labels {
        crate::text::identifier::check_label_key(key)?;
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Err(format!(
                "the value of label {key:?} is longer than {MAX_LABEL_VALUE_BYTES} bytes"
            ));
        }
        if !crate::text::is_printable_line(value) {
            return Err(format!(
                "the value of label {key:?} must be printable text (no control or invisible formatting characters)"
            ));
        }
    }
    Ok(())
}

/// Checks a task id: up to 256 bytes, no control characters.
pub fn check_task_id(task_id: &str) -> Result<(), String> {
    if task_id.len() > MAX_TASK_ID_BYTES {
        return Err(format!("task_id is longer than {MAX_TASK_ID_BYTES} bytes"));
    }
    if task_id.chars().any(char::is_control) {
        return Err("task_id contains a control character".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    #[test]
    fn placeholders_are_replaced_as_whole_arguments_only() {
        let command = strings(&[
            "/bin/sh",
            "-c",
            "{prompt}",
            "{task_id}",
            "{agent_id}",
            "{workdir}",
            "{other}",
        ]);
        check_template(&command).expect("valid");
        let rendered = render(
            &command,
            Substitutions {
                prompt: "echo hi; rm -rf /",
                task_id: "job 1",
                agent_id: "a-1",
                workdir: "/data/agents/a-1/work",
            },
        );
        assert_eq!(
            rendered,
            strings(&[
                "/bin/sh",
                "-c",
                "echo hi; rm -rf /",
                "job 1",
                "a-1",
                "/data/agents/a-1/work",
                "{other}"
            ])
        );
    }

    #[test]
    fn embedded_placeholders_empty_commands_and_nul_bytes_are_refused() {
        for bad in [
            strings(&[]),
            strings(&[""]),
            strings(&["{prompt}"]),
            strings(&["claude", "--prompt={prompt}"]),
            strings(&["/bin/sh", "-c", "echo {prompt}"]),
            strings(&["echo", "a\0b"]),
        ] {
            assert!(check_template(&bad).is_err(), "{bad:?}");
        }
        // Braces that are no placeholder are ordinary text.
        check_template(&strings(&["awk", "{print $1}"])).expect("valid");
    }

    #[test]
    fn labels_are_bounded_and_plain() {
        let ok = BTreeMap::from([
            ("team".to_owned(), "blue".to_owned()),
            ("mosaic.dev/job".to_owned(), String::new()),
        ]);
        check_labels(&ok).expect("valid");
        let too_many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|index| (format!("k{index}"), "v".to_owned()))
            .collect();
        assert!(check_labels(&too_many).is_err());
        for (key, value) in [
            ("", "v"),
            ("has space", "v"),
            ("k", "line\nbreak"),
            ("k", "invoice\u{202e}fdp.exe"),
            (&"k".repeat(MAX_LABEL_KEY_BYTES + 1) as &str, "v"),
            ("k", &"v".repeat(MAX_LABEL_VALUE_BYTES + 1) as &str),
        ] {
            let labels = BTreeMap::from([(key.to_owned(), value.to_owned())]);
            assert!(check_labels(&labels).is_err(), "{key:?}={value:?}");
        }
    }

    #[test]
    fn type_names_and_task_ids_are_checked() {
        check_type_name("claude-3.5_x").expect("valid");
        for bad in ["", "a b", "a/b", &"x".repeat(MAX_TYPE_NAME_BYTES + 1)] {
            assert!(check_type_name(bad).is_err(), "{bad:?}");
        }
        check_task_id("job-42").expect("valid");
        assert!(check_task_id("a\u{7}").is_err());
        assert!(check_task_id(&"t".repeat(MAX_TASK_ID_BYTES + 1)).is_err());
    }
}
