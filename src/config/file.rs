//! The `--config` TOML file and `idlerig config --print`. A file's settings are turned into
//! the `IDLERIG_*` variables of the same flags before the command line is parsed, and only
//! where the variable is not already set, so the order of precedence is: flags, environment,
//! file, defaults. Keys are the long flag names (`max-running` or `max_running`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: unknown setting `{key}` (settings are the long flags of `idlerig serve --help`)")]
    UnknownKey { path: String, key: String },
    #[error("config file {path}: `{key}`: {message}")]
    BadValue {
        path: String,
        key: String,
        message: String,
    },
}

/// The variables set from the file, for `config --print` to say where a value came from.
static FROM_FILE: OnceLock<Vec<String>> = OnceLock::new();

/// The file named by `--config FILE`, `--config=FILE` or `IDLERIG_CONFIG`, for the commands
/// that take one (`serve`, `config`).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let sub = args.get(1)?.to_str()?;
    if sub != "serve" && sub != "config" {
        return None;
    }
    let mut it = args.iter().skip(2);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("IDLERIG_CONFIG").map(PathBuf::from)
}

/// Reads the config file named on the command line (if any) and sets the environment
/// variables of its settings that are not already set. Call before parsing, while the
/// process has one thread.
pub fn apply_config_file(args: &[OsString], cli: &Command) -> Result<(), ConfigError> {
    let Some(path) = config_path(args) else {
        return Ok(());
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let serve = cli
        .find_subcommand("serve")
        .expect("the CLI has a serve command");
    let mut set = Vec::new();
    for (var, value) in settings_from_toml(&text, &path, serve)? {
        if std::env::var_os(&var).is_none() {
            // Single-threaded here: `main` calls this before starting any thread.
            std::env::set_var(&var, value);
            set.push(var);
        }
    }
    let _ = FROM_FILE.set(set);
    Ok(())
}

/// The `(variable, value)` pairs a config file stands for, checked against `serve`'s flags.
pub fn settings_from_toml(
    text: &str,
    path: &Path,
    serve: &Command,
) -> Result<Vec<(String, String)>, ConfigError> {
    let path_s = path.display().to_string();
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path_s.clone(),
            message: e.to_string(),
        })?;
    let mut out = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
            .ok_or_else(|| ConfigError::UnknownKey {
                path: path_s.clone(),
                key: key.clone(),
            })?;
        let var =
            arg.get_env()
                .and_then(|v| v.to_str())
                .ok_or_else(|| ConfigError::UnknownKey {
                    path: path_s.clone(),
                    key: key.clone(),
                })?;
        let bad = |message: &str| ConfigError::BadValue {
            path: path_s.clone(),
            key: key.clone(),
            message: message.into(),
        };
        let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                _ => Err(bad("expected a string, number or boolean")),
            }
        };
        let value = match &value {
            toml::Value::Array(items) => {
                let items = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
                if items.iter().any(|i| i.contains(',')) {
                    return Err(bad("list items may not contain a comma"));
                }
                items.join(",")
            }
            v => scalar(v)?,
        };
        out.push((var.to_string(), value));
    }
    Ok(out)
}

/// The effective settings of `serve` as a TOML document, one line per flag with where its
/// value came from; secrets (flags whose environment values are hidden) are redacted.
pub fn effective_config_toml(serve: &Command, matches: &ArgMatches) -> String {
    let from_file = FROM_FILE.get().map(Vec::as_slice).unwrap_or(&[]);
    let mut out = String::from(
        "# idlerig serve: effective configuration (flags > IDLERIG_* environment > --config file > defaults)\n\
         # secrets are redacted; this output is itself a valid --config file\n",
    );
    for arg in serve.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version" | "config" | "print") || arg.is_hide_set() {
            continue;
        }
        let id = arg.get_id().as_str();
        let env = arg.get_env().and_then(|v| v.to_str()).unwrap_or("");
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "command line".to_string(),
            Some(ValueSource::EnvVariable) if from_file.iter().any(|v| v == env) => {
                "config file".to_string()
            }
            Some(ValueSource::EnvVariable) => format!("env {env}"),
            Some(ValueSource::DefaultValue) => "default".to_string(),
            _ => {
                out.push_str(&format!("# {long} = (not set)\n"));
                continue;
            }
        };
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|vs| vs.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let secret = arg.is_hide_env_values_set();
        let render = |v: &str| -> String {
            if secret {
                "\"<redacted>\"".into()
            } else if v.parse::<f64>().is_ok_and(f64::is_finite) || v == "true" || v == "false" {
                v.to_string()
            } else {
                toml::Value::String(v.to_string()).to_string()
            }
        };
        let many = arg.get_num_args().is_some_and(|n| n.max_values() > 1)
            || arg.get_value_delimiter().is_some();
        let rendered = if many {
            format!(
                "[{}]",
                values
                    .iter()
                    .map(|v| render(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            values.first().map(|v| render(v)).unwrap_or_default()
        };
        out.push_str(&format!("{long} = {rendered}  # {source}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn serve() -> Command {
        crate::config::Cli::command()
            .find_subcommand("serve")
            .unwrap()
            .clone()
    }

    #[test]
    fn toml_settings_become_the_flags_environment_variables() {
        let text = r#"
port = 9000
max_running = 4
api-key = ["k1", "k2"]
no-mine = true
power-price = 0.31
host = "0.0.0.0"
"#;
        let mut got = settings_from_toml(text, Path::new("c.toml"), &serve()).unwrap();
        got.sort();
        let want = [
            ("IDLERIG_API_KEY", "k1,k2"),
            ("IDLERIG_HOST", "0.0.0.0"),
            ("IDLERIG_MAX_RUNNING", "4"),
            ("IDLERIG_NO_MINE", "true"),
            ("IDLERIG_PORT", "9000"),
            ("IDLERIG_POWER_PRICE", "0.31"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let e = settings_from_toml("prot = 1", Path::new("c.toml"), &serve()).unwrap_err();
        assert!(e.to_string().contains("unknown setting `prot`"), "{e}");
        let e = settings_from_toml("[pool]\nx = 1", Path::new("c.toml"), &serve()).unwrap_err();
        assert!(e.to_string().contains("`pool`"), "{e}");
        let e = settings_from_toml("port = {a = 1}", Path::new("c.toml"), &serve()).unwrap_err();
        assert!(e.to_string().contains("`port`"), "{e}");
        let e = settings_from_toml("port = ", Path::new("c.toml"), &serve()).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn the_printed_configuration_redacts_secrets_and_reads_back() {
        let cmd = crate::config::Cli::command();
        let m = cmd.clone().get_matches_from([
            "idlerig",
            "config",
            "--print",
            "--api-key",
            "sk-very-secret",
            "--pass",
            "pool-secret",
            "--port",
            "9001",
            "--pool",
            "stratum+tcp://a:1,stratum+tcp://b:2",
        ]);
        let (_, sub) = m.subcommand().unwrap();
        let text = effective_config_toml(cmd.find_subcommand("config").unwrap(), sub);
        assert!(!text.contains("sk-very-secret") && !text.contains("pool-secret"));
        assert!(
            text.contains("api-key = [\"<redacted>\"]  # command line"),
            "{text}"
        );
        assert!(text.contains("port = 9001  # command line"), "{text}");
        assert!(text.contains("host = \"127.0.0.1\"  # default"), "{text}");
        // What it prints is a config file that gives the same settings back.
        let settings = settings_from_toml(&text, Path::new("printed"), &serve()).unwrap();
        let get = |var: &str| {
            settings
                .iter()
                .find(|(v, _)| v == var)
                .map(|(_, x)| x.as_str())
        };
        assert_eq!(get("IDLERIG_PORT"), Some("9001"));
        assert_eq!(
            get("IDLERIG_POOL"),
            Some("stratum+tcp://a:1,stratum+tcp://b:2")
        );
    }
}
