//! A request's arguments, checked the way qemu-ga's generated visitors
//! check them, with the same error texts.

use serde_json::{Map, Value};

/// An error reply: qemu-ga's class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QgaError {
    pub class: &'static str,
    pub desc: String,
}

impl QgaError {
    /// The class of almost every qemu-ga error.
    pub fn generic(desc: impl Into<String>) -> QgaError {
        QgaError {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

/// What a command answers.
pub type Answer = Result<Value, QgaError>;

/// The arguments of one request.
pub struct Args {
    map: Map<String, Value>,
}

fn wrong_type(name: &str, want: &str) -> QgaError {
    QgaError::generic(format!(
        "Invalid parameter type for '{name}', expected: {want}"
    ))
}

fn missing(name: &str) -> QgaError {
    QgaError::generic(format!("Parameter '{name}' is missing"))
}

impl Args {
    pub fn new(map: Map<String, Value>) -> Args {
        Args { map }
    }

    /// Refuses arguments the command does not take.
    pub fn only(&self, known: &[&str]) -> Result<(), QgaError> {
        match self.map.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(QgaError::generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, QgaError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| wrong_type(name, "integer")),
        }
    }

    pub fn int(&self, name: &str) -> Result<i64, QgaError> {
        self.opt_int(name)?.ok_or_else(|| missing(name))
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<&str>, QgaError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| wrong_type(name, "string")),
        }
    }

    pub fn str(&self, name: &str) -> Result<&str, QgaError> {
        self.opt_str(name)?.ok_or_else(|| missing(name))
    }

    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>, QgaError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| wrong_type(name, "boolean")),
        }
    }

    /// A list of strings (`arg`, `env`).
    pub fn opt_strs(&self, name: &str) -> Result<Vec<String>, QgaError> {
        let Some(v) = self.map.get(name) else {
            return Ok(Vec::new());
        };
        let list = v.as_array().ok_or_else(|| wrong_type(name, "array"))?;
        list.iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| wrong_type(&format!("{name}[0]"), "string"))
    }

    /// An integer, or one of `names` standing for 0, 1, 2... (`whence`).
    pub fn int_or_name(&self, name: &str, names: &[&str]) -> Result<i64, QgaError> {
        match self.map.get(name) {
            None => Err(missing(name)),
            Some(Value::String(s)) => names
                .iter()
                .position(|n| n == s)
                .map(|i| i as i64)
                .ok_or_else(|| {
                    QgaError::generic(format!("Parameter '{name}' does not accept value '{s}'"))
                }),
            Some(v) => v.as_i64().ok_or_else(|| wrong_type(name, "integer")),
        }
    }
}
