<%@ page contentType="text/plain; charset=UTF-8" import="java.sql.*,java.nio.file.*" %><%
    // Cloud48's sample application: who answers, and a row of the environment's database.
    String id = System.getenv("CLOUD48_CONTAINER");
    String url = "";
    try {
        url = new String(Files.readAllBytes(Paths.get("/etc/cloud48/datasource"))).trim();
    } catch (java.io.IOException e) {
        // No database configured yet.
    }
    if (url.isEmpty()) {
        out.print("tomcat " + id + ": no database\n");
        return;
    }
    // The URL names the user (`?user=`, from the database's parameters); the password is the
    // environment's secret `mysql`, which the core gave this container.
    java.util.Properties login = new java.util.Properties();
    if (!url.contains("user=")) {
        login.setProperty("user", "app");
    }
    login.setProperty("password", System.getenv().getOrDefault("CLOUD48_DB_PASSWORD", ""));
    try {
        Class.forName("org.mariadb.jdbc.Driver");
        try (Connection c = DriverManager.getConnection(url.replace("jdbc:mysql:", "jdbc:mariadb:"), login);
             Statement s = c.createStatement();
             ResultSet r = s.executeQuery("SELECT text FROM greetings WHERE id = 1")) {
            out.print("tomcat " + id + ": " + (r.next() ? r.getString(1) : "no greeting") + "\n");
        }
    } catch (Exception e) {
        response.setStatus(503);
        out.print("tomcat " + id + ": database " + url + " failed: " + e.getMessage() + "\n");
    }
%>
