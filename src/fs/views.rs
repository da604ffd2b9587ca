//! Field views of a value: `NAME@json/KEY` and `NAME@conn/FIELD`.
//!
//! `@json`: a value that is a JSON object has one field per top-level key
//! whose name can be a file name; a string field is its text, anything else
//! its compact JSON. `@conn`: a value Airflow would accept as a connection
//! (a URI, or JSON starting with `{`) has the fields `conn_type`, `host`,
//! `login`, `password`, `schema`, `port` and `extra`, parsed as Airflow 3's
//! `Connection` parses them: Python's `urlsplit` and `unquote`, `postgresql`
//! read as `postgres`, `__extra__` or the query parameters (JSON-decoded
//! where they parse) as extra, dumped as Python's `json.dumps` would. A field
//! Airflow leaves empty or unset is absent; a URI without a scheme (which
//! Airflow would accept as a connection of no type) has no view. Every field's bytes are a
//! `SecretBytes`, zeroed when dropped.

use serde_json::{Map, Value};

use crate::names::View;
use crate::secret::SecretBytes;

/// The fields of `value` as `view` shows them, in order; `None` when the
/// value is not a JSON object (`@json`) or not a connection (`@conn`).
pub fn fields(view: View, value: &[u8]) -> Option<Vec<(String, SecretBytes)>> {
    let text = std::str::from_utf8(value).ok()?;
    match view {
        View::Json => json_fields(text),
        View::Conn => conn_fields(text).map(|conn| {
            conn.into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect()
        }),
    }
}

/// Whether a key can be a file name here.
fn usable_key(key: &str) -> bool {
    !key.is_empty() && key != "." && key != ".." && !key.contains(['/', '\0'])
}

fn json_fields(text: &str) -> Option<Vec<(String, SecretBytes)>> {
    let object: indexmap_like::Object = serde_json::from_str(text).ok()?;
    let mut fields = Vec::with_capacity(object.0.len());
    for (key, raw) in object.0 {
        if !usable_key(&key) {
            continue;
        }
        let bytes = match serde_json::from_str::<String>(raw.get()) {
            Ok(string) => SecretBytes::from_string(string),
            Err(_) => SecretBytes::new(minify(raw.get())),
        };
        // A repeated key: the last one wins, as in Python's json.loads.
        fields.retain(|(existing, _): &(String, SecretBytes)| *existing != key);
        fields.push((key, bytes));
    }
    Some(fields)
}

/// A JSON object read without copying its values: keys in order, each value
/// as the raw text of the input.
mod indexmap_like {
    use serde_json::value::RawValue;

    pub struct Object<'a>(pub Vec<(String, &'a RawValue)>);

    impl<'de: 'a, 'a> serde::Deserialize<'de> for Object<'a> {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Object<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Self::Value, A::Error> {
                    let mut entries = Vec::new();
                    while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                        entries.push((key, value));
                    }
                    Ok(Object(entries))
                }
            }
            deserializer.deserialize_map(Visitor)
        }
    }
}

/// Valid JSON text without the whitespace between tokens.
fn minify(json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for byte in json.bytes() {
        if in_string {
            out.push(byte);
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if !byte.is_ascii_whitespace() {
            in_string = byte == b'"';
            out.push(byte);
        }
    }
    out
}

/// The fields of an Airflow connection, in Airflow's order.
pub const CONN_FIELDS: [&str; 7] = [
    "conn_type",
    "host",
    "login",
    "password",
    "schema",
    "port",
    "extra",
];

#[derive(Default)]
struct Connection {
    conn_type: Option<String>,
    host: Option<String>,
    login: Option<String>,
    password: Option<String>,
    schema: Option<String>,
    port: Option<u16>,
    extra: Option<String>,
}

impl Connection {
    fn into_fields(self) -> Vec<(&'static str, SecretBytes)> {
        let values = [
            self.conn_type,
            self.host,
            self.login,
            self.password,
            self.schema,
            self.port.map(|p| p.to_string()),
            self.extra,
        ];
        CONN_FIELDS
            .into_iter()
            .zip(values)
            .filter_map(|(name, value)| {
                value
                    .filter(|v| !v.is_empty())
                    .map(|v| (name, SecretBytes::from_string(v)))
            })
            .collect()
    }
}

fn conn_fields(text: &str) -> Option<Vec<(&'static str, SecretBytes)>> {
    // As Airflow's secrets backends deserialize a connection value.
    let text = text.trim();
    let connection = if text.starts_with('{') {
        from_json(text)?
    } else {
        from_uri(text)?
    };
    // Airflow 3 refuses a connection whose extra is not a JSON object.
    if let Some(extra) = connection.extra.as_deref().filter(|e| !e.is_empty()) {
        if !matches!(serde_json::from_str::<Value>(extra), Ok(Value::Object(_))) {
            return None;
        }
    }
    Some(connection.into_fields())
}

fn normalize_conn_type(conn_type: &str) -> String {
    if conn_type == "postgresql" {
        "postgres".into()
    } else {
        conn_type.replace('-', "_")
    }
}

/// `Connection.from_json`.
fn from_json(text: &str) -> Option<Connection> {
    let Value::Object(mut map) = serde_json::from_str::<Value>(text).ok()? else {
        return None;
    };
    // Connection(**kwargs) takes its fields and these, and refuses the rest.
    const OTHER_KEYWORDS: [&str; 3] = ["conn_id", "description", "uri"];
    let known = |k: &str| CONN_FIELDS.contains(&k) || OTHER_KEYWORDS.contains(&k);
    if map.keys().any(|k| !known(k)) {
        return None;
    }
    let text_of = |value: Option<Value>| -> Option<String> {
        match value? {
            Value::Null => None,
            Value::String(s) => Some(s),
            other => Some(python_str(&other)),
        }
    };
    if let Some(uri) = map.remove("uri") {
        if CONN_FIELDS.iter().any(|k| map.get(*k).is_some_and(truthy)) {
            return None; // Airflow refuses a URI together with fields
        }
        return from_uri(&text_of(Some(uri))?);
    }
    let extra = match map.remove("extra") {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(value) if truthy(&value) => Some(python_dumps(&value)),
        _ => None,
    };
    let port = match map.remove("port") {
        Some(value) if truthy(&value) => Some(python_int(&value)?),
        _ => None,
    };
    Some(Connection {
        conn_type: text_of(map.remove("conn_type"))
            .filter(|t| !t.is_empty())
            .map(|t| normalize_conn_type(&t)),
        host: text_of(map.remove("host")),
        login: text_of(map.remove("login")),
        password: text_of(map.remove("password")),
        schema: text_of(map.remove("schema")),
        port,
        extra,
    })
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Python's `int(port)` for a port, within what a port can be.
fn python_int(value: &Value) -> Option<u16> {
    let number = match value {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.trunc() as i64))?,
        Value::String(s) => s.trim().parse::<i64>().ok()?,
        Value::Bool(b) => i64::from(*b),
        _ => return None,
    };
    u16::try_from(number).ok()
}

/// Python's `str()` of a JSON scalar or container (what Airflow would store).
fn python_str(value: &Value) -> String {
    match value {
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        other => python_dumps(other),
    }
}

/// Python's `json.dumps` with its defaults: `", "` and `": "` separators and
/// every non-ASCII character escaped.
pub fn python_dumps(value: &Value) -> String {
    let mut out = String::new();
    dump(value, &mut out);
    out
}

fn dump(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (None, Some(u), _) => out.push_str(&u.to_string()),
            (None, None, Some(f)) => out.push_str(&python_float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => dump_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                dump(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => dump_object(map, out),
    }
}

fn dump_object(map: &Map<String, Value>, out: &mut String) {
    out.push('{');
    for (i, (key, item)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        dump_string(key, out);
        out.push_str(": ");
        dump(item, out);
    }
    out.push('}');
}

/// Python's `repr` of a float: shortest round-trip digits, `e+XX` beyond 1e16.
fn python_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        }
        .into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let text = format!("{f:e}"); // 1e16, 1.5e-7
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let exponent: i32 = exponent.parse().unwrap_or(0);
        return format!(
            "{mantissa}e{}{:02}",
            if exponent < 0 { '-' } else { '+' },
            exponent.abs()
        );
    }
    format!("{f:?}") // Rust's Debug is shortest round-trip, with ".0"
}

fn dump_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `urllib.parse.unquote`: `%XX` decoded, the rest kept, invalid
/// UTF-8 replaced.
fn unquote(text: &str) -> String {
    if !text.contains('%') {
        return text.to_string();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What Python's `urlsplit` returns, as far as Airflow uses it.
struct Split<'a> {
    scheme: String,
    netloc: &'a str,
    path: &'a str,
    query: &'a str,
}

fn urlsplit(url: &str) -> Option<Split<'_>> {
    let mut scheme = String::new();
    let mut rest = url;
    if let Some(i) = url.find(':') {
        let candidate = &url[..i];
        let starts_alpha = candidate
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic());
        if i > 0
            && starts_alpha
            && candidate
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            scheme = candidate.to_ascii_lowercase();
            rest = &url[i + 1..];
        }
    }
    let mut netloc = "";
    if let Some(after) = rest.strip_prefix("//") {
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        netloc = &after[..end];
        rest = &after[end..];
        if netloc.contains('[') != netloc.contains(']') {
            return None; // "Invalid IPv6 URL"
        }
    }
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    Some(Split {
        scheme,
        netloc,
        path,
        query,
    })
}

impl Split<'_> {
    fn userinfo(&self) -> Option<&str> {
        self.netloc.rsplit_once('@').map(|(info, _)| info)
    }

    fn username(&self) -> Option<&str> {
        self.userinfo()
            .map(|info| info.split_once(':').map_or(info, |(user, _)| user))
    }

    fn password(&self) -> Option<&str> {
        self.userinfo()?
            .split_once(':')
            .map(|(_, password)| password)
    }

    /// (hostname as given, port text).
    fn host_and_port(&self) -> (&str, &str) {
        let hostinfo = self.netloc.rsplit_once('@').map_or(self.netloc, |(_, h)| h);
        match hostinfo.split_once('[') {
            Some((_, bracketed)) => {
                let (host, after) = bracketed.split_once(']').unwrap_or((bracketed, ""));
                (host, after.split_once(':').map_or("", |(_, port)| port))
            }
            None => hostinfo.split_once(':').unwrap_or((hostinfo, "")),
        }
    }

    /// `.hostname`: lowercased, `None` when empty.
    fn hostname(&self) -> Option<String> {
        let (host, _) = self.host_and_port();
        (!host.is_empty()).then(|| host.to_lowercase())
    }

    /// `.port`: `Err` where Python raises ValueError.
    fn port(&self) -> Result<Option<u16>, ()> {
        let (_, port) = self.host_and_port();
        if port.is_empty() {
            return Ok(None);
        }
        if !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        port.parse::<u16>().map(Some).map_err(|_| ())
    }
}

/// `Connection(uri=...)`, Airflow 3's `_parse_from_uri`.
fn from_uri(uri: &str) -> Option<Connection> {
    // urlsplit drops leading C0 controls and spaces, and tabs and newlines anywhere.
    let cleaned: String = uri
        .trim_start_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\r' | '\n'))
        .collect();
    let uri = cleaned.as_str();
    let schemes = uri.matches("://").count();
    if schemes > 2 {
        return None;
    }
    let host_with_protocol = schemes == 2;
    let first = urlsplit(uri)?;
    let conn_type = first.scheme.clone();
    if conn_type.is_empty() {
        // Airflow would take any text as a connection of no type; without a
        // `scheme://` it is not one worth showing fields of.
        return None;
    }
    let rest = uri.replace(
        &format!("{conn_type}://"),
        if host_with_protocol { "" } else { "//" },
    );
    if host_with_protocol {
        let before = rest.split("://").next().unwrap_or("");
        if before.contains('@') || before.contains(':') {
            return None;
        }
    }
    let parts = urlsplit(&rest)?;
    let protocol = host_with_protocol.then(|| parts.scheme.clone());
    let host = netloc_to_hostname(&parts);
    let host = match (protocol, host.is_empty()) {
        (_, true) => host,
        (Some(protocol), false) => format!("{protocol}://{host}"),
        (None, false) => host,
    };
    let schema = parts.path.get(1..).unwrap_or("");
    let extra = if parts.query.is_empty() {
        None
    } else {
        Some(query_extra(parts.query))
    };
    Some(Connection {
        conn_type: Some(normalize_conn_type(&conn_type)),
        host: Some(host),
        login: parts.username().filter(|u| !u.is_empty()).map(unquote),
        password: parts.password().filter(|p| !p.is_empty()).map(unquote),
        schema: Some(unquote(schema)),
        port: parts.port().ok()?,
        extra,
    })
}

/// Airflow's `_parse_netloc_to_hostname`.
fn netloc_to_hostname(parts: &Split) -> String {
    let hostname = unquote(&parts.hostname().unwrap_or_default());
    if !hostname.contains('/') {
        return hostname;
    }
    let mut hostname = parts.netloc;
    if let Some((_, after)) = hostname.rsplit_once('@') {
        hostname = after;
    }
    if let Some((before, _)) = hostname.split_once(':') {
        hostname = before;
    }
    unquote(hostname)
}

/// The extra of a URI's query: `__extra__` as is, or the parameters (each
/// JSON-decoded where it parses) dumped as a JSON object.
fn query_extra(query: &str) -> String {
    let mut pairs: Map<String, Value> = Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = unquote(&name.replace('+', " "));
        let value = unquote(&value.replace('+', " "));
        pairs.insert(name, Value::String(value));
    }
    if let Some(Value::String(extra)) = pairs.get("__extra__") {
        return extra.clone();
    }
    for value in pairs.values_mut() {
        if let Value::String(text) = value {
            if !text.is_empty() {
                if let Ok(parsed) = serde_json::from_str::<Value>(text) {
                    *value = parsed;
                }
            }
        }
    }
    let mut out = String::new();
    dump_object(&pairs, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(text: &str) -> Vec<(String, String)> {
        fields(View::Conn, text.as_bytes())
            .unwrap_or_else(|| panic!("not a connection: {text}"))
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.expose().to_vec()).unwrap()))
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn uris_parse_as_airflow_parses_them() {
        assert_eq!(
            conn("postgresql://us%40er:p%2Fss@Db.Example:5432/app?sslmode=require&timeout=5"),
            pairs(&[
                ("conn_type", "postgres"),
                ("host", "db.example"),
                ("login", "us@er"),
                ("password", "p/ss"),
                ("schema", "app"),
                ("port", "5432"),
                ("extra", r#"{"sslmode": "require", "timeout": 5}"#),
            ])
        );
        assert_eq!(
            conn("google-cloud-platform://?__extra__=%7B%22a%22%3A+1%7D"),
            pairs(&[
                ("conn_type", "google_cloud_platform"),
                ("extra", r#"{"a": 1}"#)
            ])
        );
        assert_eq!(
            conn("http://https://example.com:443/path"),
            pairs(&[
                ("conn_type", "http"),
                ("host", "https://example.com"),
                ("schema", "path"),
                ("port", "443")
            ])
        );
        assert!(fields(View::Conn, b"a://b://c://d").is_none());
        assert!(fields(View::Conn, b"s://h?__extra__=not+json").is_none());
        assert!(fields(View::Conn, b"mysql://h:notaport/db").is_none());
    }

    #[test]
    fn json_connections_parse_as_airflow_parses_them() {
        assert_eq!(
            conn(
                r#" {"conn_type": "postgresql", "host": "h", "port": "5432", "extra": {"b": "é", "a": [1, 2.5]}}"#
            ),
            pairs(&[
                ("conn_type", "postgres"),
                ("host", "h"),
                ("port", "5432"),
                ("extra", r#"{"b": "\u00e9", "a": [1, 2.5]}"#),
            ])
        );
        assert!(fields(View::Conn, br#"{"conn_type": "x", "unknown": 1}"#).is_none());
    }

    #[test]
    fn json_objects_have_a_field_per_key() {
        let got: Vec<(String, Vec<u8>)> =
            fields(View::Json, br#"{"password": "p\u00e4ss\n", "port": 5432, "nested": { "a" : [1, 2] }, "a/b": 1, "": 2}"#)
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.expose().to_vec()))
                .collect();
        assert_eq!(
            got,
            vec![
                ("password".to_string(), "päss\n".as_bytes().to_vec()),
                ("port".to_string(), b"5432".to_vec()),
                ("nested".to_string(), br#"{"a":[1,2]}"#.to_vec()),
            ]
        );
        assert!(fields(View::Json, b"[1,2]").is_none());
        assert!(fields(View::Json, b"\"text\"").is_none());
        assert!(fields(View::Json, b"not json").is_none());
    }

    proptest::proptest! {
        #[test]
        fn no_value_makes_a_view_panic(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
                                       text in ".{0,200}") {
            for view in [View::Json, View::Conn] {
                let _ = fields(view, &value);
                let _ = fields(view, text.as_bytes());
                let _ = fields(view, format!("s://{text}").as_bytes());
                let _ = fields(view, format!("{{\"host\": {text:?}, \"extra\": {text:?}}}").as_bytes());
            }
        }
    }

    #[test]
    fn python_float_formatting() {
        assert_eq!(python_float(2.5), "2.5");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e-7), "1.5e-07");
        assert_eq!(python_float(100.0), "100.0");
    }
}
